//! The input's columns: which one holds each role (user, time, ...), and their
//! values converted for the row loop, whatever Arrow type a file gives them.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Int64Array, LargeStringArray, StringArray,
    StringBuilder, StringViewArray, new_empty_array, new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int64Type, Schema, TimeUnit,
    TimestampMillisecondType,
};
use arrow::error::ArrowError;
use shoal_spec::SpecError;
use shoal_spec::spec::{Columns, JobSpec};

use crate::error::WorkerError;

// ---------------------------------------------------------------------------
// Columns

/// What a column of the input is used for; `field` is its key in `input.columns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    User,
    Time,
    Order,
    Item,
    Quantity,
    Price,
    Amount,
    Event,
    ItemLabel,
}

/// How many roles there are.
const ROLES: usize = Role::ALL.len();

impl Role {
    const ALL: [Role; 9] = [
        Role::User,
        Role::Time,
        Role::Order,
        Role::Item,
        Role::Quantity,
        Role::Price,
        Role::Amount,
        Role::Event,
        Role::ItemLabel,
    ];

    pub(crate) fn field(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Time => "time",
            Role::Order => "order",
            Role::Item => "item",
            Role::Quantity => "quantity",
            Role::Price => "price",
            Role::Amount => "amount",
            Role::Event => "event",
            Role::ItemLabel => "item_label",
        }
    }

    fn column(self, cols: &Columns) -> Option<&str> {
        match self {
            Role::User => Some(cols.user()).filter(|c| !c.is_empty()),
            Role::Time => cols.time(),
            Role::Order => cols.order(),
            Role::Item => cols.item(),
            Role::Quantity => cols.quantity(),
            Role::Price => cols.price(),
            Role::Amount => cols.amount(),
            Role::Event => cols.event(),
            Role::ItemLabel => cols.item_label(),
        }
    }
}

/// Where each role's column is: its index in the input schema and its position in
/// the projected batches (the projection is the sorted, distinct input indices).
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) projection: Vec<usize>,
    slots: [Option<Slot>; ROLES],
}

#[derive(Debug, Clone)]
pub(crate) struct Slot {
    /// Position in the projected batch.
    pos: usize,
    /// The column's name in the input.
    pub(crate) column: String,
}

/// The input column named `want`: an exact match, else the first match ignoring
/// case and surrounding spaces.
pub(crate) fn find_column(schema: &Schema, want: &str) -> Option<usize> {
    let fields = schema.fields();
    fields.iter().position(|f| f.name() == want).or_else(|| {
        let want = want.trim();
        fields
            .iter()
            .position(|f| f.name().trim().eq_ignore_ascii_case(want))
    })
}

impl Plan {
    pub(crate) fn new(spec: &JobSpec, schema: &Schema, file: &str) -> Result<Plan, WorkerError> {
        let cols = &spec.input.columns;
        let mut found: [Option<usize>; ROLES] = [None; ROLES];
        for role in Role::ALL {
            let Some(want) = role.column(cols) else {
                continue;
            };
            match find_column(schema, want) {
                Some(index) => found[role as usize] = Some(index),
                None => {
                    return Err(WorkerError::MissingColumn {
                        file: file.to_string(),
                        field: role.field(),
                        column: want.to_string(),
                        present: schema.fields().iter().map(|f| f.name().clone()).collect(),
                    });
                }
            }
        }
        let mut projection: Vec<usize> = found.iter().flatten().copied().collect();
        projection.sort_unstable();
        projection.dedup();
        let slots = found.map(|index| {
            index.map(|index| Slot {
                pos: projection.binary_search(&index).expect("projected"),
                column: schema.field(index).name().clone(),
            })
        });
        Ok(Plan { projection, slots })
    }

    pub(crate) fn slot(&self, role: Role) -> Option<&Slot> {
        self.slots[role as usize].as_ref()
    }
}

/// A text column of any of Arrow's string layouts.
pub(crate) enum Text {
    Utf8(StringArray),
    Large(LargeStringArray),
    View(StringViewArray),
}

impl Text {
    fn from_string_array(array: &ArrayRef) -> Option<Text> {
        match array.data_type() {
            DataType::Utf8 => Some(Text::Utf8(array.as_string::<i32>().clone())),
            DataType::LargeUtf8 => Some(Text::Large(array.as_string::<i64>().clone())),
            DataType::Utf8View => Some(Text::View(array.as_string_view().clone())),
            _ => None,
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        match self {
            Text::Utf8(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::Large(a) => (!a.is_null(i)).then(|| a.value(i)),
            Text::View(a) => (!a.is_null(i)).then(|| a.value(i)),
        }
    }
}

/// A number column: numeric input cast to f64, or text parsed row by row.
pub(crate) enum Numbers {
    F64(Float64Array),
    Text(Text),
}

/// One value of a number column.
pub(crate) enum Num {
    Missing,
    Bad,
    Value(f64),
}

impl Numbers {
    #[inline]
    pub(crate) fn get(&self, i: usize) -> Num {
        match self {
            Numbers::F64(a) => {
                if a.is_null(i) {
                    Num::Missing
                } else {
                    let v = a.value(i);
                    if v.is_finite() {
                        Num::Value(v)
                    } else {
                        Num::Bad
                    }
                }
            }
            Numbers::Text(t) => match t.get(i).map(str::trim) {
                None | Some("") => Num::Missing,
                Some(s) => match s.parse::<f64>() {
                    Ok(v) if v.is_finite() => Num::Value(v),
                    _ => Num::Bad,
                },
            },
        }
    }

    /// The value as read, for error messages.
    pub(crate) fn describe(&self, i: usize) -> String {
        match self {
            Numbers::F64(a) if a.is_null(i) => "null".to_string(),
            Numbers::F64(a) => format!("`{}`", a.value(i)),
            Numbers::Text(t) => describe_text(t.get(i)),
        }
    }
}

pub(crate) fn describe_text(value: Option<&str>) -> String {
    match value {
        None => "empty".to_string(),
        Some(s) if s.trim().is_empty() => format!("blank (`{s}`)"),
        Some(s) => format!("`{s}`"),
    }
}

/// A time column: typed times as ms since the epoch, or text parsed row by row.
pub(crate) enum Times {
    Ms(Int64Array),
    Text(Text),
}

/// The role columns of one batch, converted for the row loop.
pub(crate) struct Prepared {
    pub(crate) user: Text,
    pub(crate) time: Times,
    pub(crate) order: Option<Text>,
    pub(crate) item: Option<Text>,
    pub(crate) quantity: Option<Numbers>,
    pub(crate) price: Option<Numbers>,
    pub(crate) amount: Option<Numbers>,
    pub(crate) event: Option<Text>,
    pub(crate) item_label: Option<Text>,
}

/// Unwraps dictionary encoding: the values' type is what counts.
pub(crate) fn decoded(array: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match array.data_type() {
        DataType::Dictionary(_, values) => cast(array, values),
        _ => Ok(array.clone()),
    }
}

pub(crate) fn user_text(array: &ArrayRef) -> Result<Option<Text>, ArrowError> {
    let array = decoded(array)?;
    let dt = array.data_type();
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(t));
    }
    let text: ArrayRef = match dt {
        DataType::Null => new_null_array(&DataType::Utf8, array.len()),
        d if d.is_integer() => cast(&array, &DataType::Utf8)?,
        // Floats as Rust prints them (`17850.0` -> `17850`), in their own width.
        DataType::Float16 | DataType::Float32 => {
            let f32s = cast(&array, &DataType::Float32)?;
            let f32s = f32s.as_primitive::<Float32Type>();
            Arc::new(format_floats(f32s.iter()))
        }
        DataType::Float64 => Arc::new(format_floats(array.as_primitive::<Float64Type>().iter())),
        _ => return Ok(None),
    };
    Ok(Text::from_string_array(&text))
}

fn format_floats<T: std::fmt::Display>(values: impl Iterator<Item = Option<T>>) -> StringArray {
    use std::fmt::Write;
    let mut b = StringBuilder::new();
    for v in values {
        match v {
            Some(v) => {
                write!(b, "{v}").expect("writing to a builder cannot fail");
                b.append_value("");
            }
            None => b.append_null(),
        }
    }
    b.finish()
}

fn id_text(array: &ArrayRef) -> Result<Option<Text>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(t));
    }
    let dt = array.data_type();
    if dt.is_integer() || *dt == DataType::Null {
        return Ok(Text::from_string_array(&cast(&array, &DataType::Utf8)?));
    }
    Ok(None)
}

pub(crate) fn numbers(array: &ArrayRef) -> Result<Option<Numbers>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(Numbers::Text(t)));
    }
    let dt = array.data_type();
    if dt.is_numeric() || *dt == DataType::Null {
        let f = cast(&array, &DataType::Float64)?;
        return Ok(Some(Numbers::F64(f.as_primitive::<Float64Type>().clone())));
    }
    Ok(None)
}

pub(crate) const MS_PER_DAY: i64 = 86_400_000;

fn times(array: &ArrayRef) -> Result<Option<Times>, ArrowError> {
    let array = decoded(array)?;
    if let Some(t) = Text::from_string_array(&array) {
        return Ok(Some(Times::Text(t)));
    }
    let ms = match array.data_type() {
        // Timestamps are UTC instants whatever their zone: keep the zone, change
        // the unit, and the values are ms since the epoch.
        DataType::Timestamp(_, tz) => {
            let ms = cast(
                &array,
                &DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
            )?;
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            Int64Array::new(ms.values().clone(), ms.nulls().cloned())
        }
        DataType::Date32 => array
            .as_primitive::<Date32Type>()
            .unary::<_, Int64Type>(|days| i64::from(days) * MS_PER_DAY),
        DataType::Date64 => {
            let ms = cast(&array, &DataType::Int64)?;
            ms.as_primitive::<Int64Type>().clone()
        }
        DataType::Null => Int64Array::new_null(array.len()),
        _ => return Ok(None),
    };
    Ok(Some(Times::Ms(ms)))
}

impl Prepared {
    /// Converts the role columns of a projected batch.
    pub(crate) fn new(
        plan: &Plan,
        columns: &[ArrayRef],
        file: &str,
    ) -> Result<Prepared, WorkerError> {
        fn get<T>(
            plan: &Plan,
            columns: &[ArrayRef],
            file: &str,
            role: Role,
            convert: fn(&ArrayRef) -> Result<Option<T>, ArrowError>,
        ) -> Result<Option<T>, WorkerError> {
            let Some(slot) = plan.slot(role) else {
                return Ok(None);
            };
            let array = &columns[slot.pos];
            let type_error = || WorkerError::ColumnType {
                file: file.to_string(),
                field: role.field(),
                column: slot.column.clone(),
                data_type: array.data_type().to_string(),
            };
            match convert(array) {
                Ok(Some(v)) => Ok(Some(v)),
                Ok(None) => Err(type_error()),
                Err(source) => Err(WorkerError::Arrow {
                    file: file.to_string(),
                    source,
                }),
            }
        }
        let required = |role: Role| {
            WorkerError::Spec(SpecError::Invalid {
                field: if role == Role::User {
                    "input.columns.user"
                } else {
                    "input.columns.time"
                },
                message: "is required".to_string(),
            })
        };
        Ok(Prepared {
            user: get(plan, columns, file, Role::User, user_text)?
                .ok_or_else(|| required(Role::User))?,
            time: get(plan, columns, file, Role::Time, times)?
                .ok_or_else(|| required(Role::Time))?,
            order: get(plan, columns, file, Role::Order, id_text)?,
            item: get(plan, columns, file, Role::Item, id_text)?,
            quantity: get(plan, columns, file, Role::Quantity, numbers)?,
            price: get(plan, columns, file, Role::Price, numbers)?,
            amount: get(plan, columns, file, Role::Amount, numbers)?,
            event: get(plan, columns, file, Role::Event, id_text)?,
            item_label: get(plan, columns, file, Role::ItemLabel, id_text)?,
        })
    }

    /// Checks, before reading any row, that every role column has a usable type.
    pub(crate) fn check_types(plan: &Plan, schema: &Schema, file: &str) -> Result<(), WorkerError> {
        let empty: Vec<ArrayRef> = plan
            .projection
            .iter()
            .map(|&i| new_empty_array(schema.field(i).data_type()))
            .collect();
        Prepared::new(plan, &empty, file).map(|_| ())
    }
}
